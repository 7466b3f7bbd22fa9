"""gigamil: whole-slide images → patches → features → attention-MIL → predictions, on any scale.

The public API lives in the subpackages (``gigamil.wsi`` today); this module only
declares the version and the error hierarchy, so that ``import gigamil`` stays cheap.
"""

from gigamil.errors import GigamilError
from gigamil.versions import gigamil_version

__version__ = gigamil_version()
__all__ = ["GigamilError", "__version__"]
