from __future__ import annotations

import pytest
import torch

from gigamil.mil.models import MILOutput, create_model, list_models

NAMES = ["abmil", "abmil_gated", "mean", "max", "transmil", "clam_sb", "clam_mb"]


def _bags(lengths: list[int], dim: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    x = torch.randn(len(lengths), n, dim, generator=g)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return x * mask[..., None], mask


def test_registry_lists_the_models() -> None:
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch_equals_one_bag_at_a_time(name: str) -> None:
    """Padding never changes a bag's output: no batch-size-1 restriction.

    TransMIL is the exception by design: its position encoding convolves the instances
    laid out on a square, and the square of a padded batch differs from a lone bag's;
    for it the masks and shapes are checked.
    """
    model = create_model(name, in_dim=12, n_classes=3).eval()
    x, mask = _bags([5, 9, 1])
    with torch.no_grad():
        out = model(x, mask)
        assert isinstance(out, MILOutput) and out.logits.shape == (3, 3)
        attn = out.attention if out.attention.ndim == 2 else out.attention[:, 0]
        assert attn.shape == (3, 9)
        for i, n in enumerate([5, 9, 1]):
            single = model(x[i : i + 1, :n], mask[i : i + 1, :n])
            if name != "transmil" or n == 9:  # the longest bag: the same square either way
                torch.testing.assert_close(out.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)
            assert torch.isfinite(single.logits).all()
    assert (attn[~mask] == 0).all()
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(out.attention.shape[:-1]),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["abmil", "abmil_gated", "mean", "max"])
def test_permutation_invariant(name: str) -> None:
    model = create_model(name, in_dim=12).eval()
    x, mask = _bags([8])
    perm = torch.randperm(8)
    with torch.no_grad():
        a, b = model(x, mask), model(x[:, perm], mask[:, perm])
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.attention[0, perm], b.attention[0], atol=1e-6, rtol=1e-5)


def test_multi_head_attention_and_gradients() -> None:
    model = create_model("abmil", in_dim=12, heads=3, gated=True)
    x, mask = _bags([4, 6])
    out = model(x, mask)
    assert out.attention.shape == (2, 3, 6)
    out.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_empty_bag_gives_no_nan() -> None:
    for name in NAMES:
        model = create_model(name, in_dim=12).eval()
        x, mask = _bags([3, 3])
        mask[1] = False
        out = model(x, mask)
        assert torch.isfinite(out.logits).all() and torch.isfinite(out.attention).all(), name


def test_models_command_lists_options() -> None:
    from typer.testing import CliRunner

    from gigamil.cli.main import app

    res = CliRunner().invoke(app, ["models"])
    assert res.exit_code == 0, res.output
    assert "transmil" in res.output and "gated" in res.output


@pytest.mark.parametrize("name", ["clam_sb", "clam_mb"])
def test_clam_instance_loss(name: str) -> None:
    model = create_model(name, in_dim=12, n_classes=2, k_sample=3)
    x, mask = _bags([10, 7])
    out = model(x, mask, label=torch.tensor([1, 0]))
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    (out.logits.sum() + out.aux_loss).backward()
    assert model.instance_classifiers[0].weight.grad is not None
    assert model.instance_classifiers[1].weight.grad is not None
    assert model(x, mask).aux_loss is None  # no labels at inference


def test_evidential_head() -> None:
    from gigamil.mil.models import dirichlet, evidential_loss

    logits = torch.tensor([[0.0, 0.0], [8.0, -8.0]])
    probs, unc = dirichlet(logits)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert unc[0] > unc[1] and ((unc > 0) & (unc <= 1)).all()
    target = torch.tensor([0, 0])
    right = evidential_loss(torch.tensor([[6.0, -6.0]] * 2), target)
    wrong = evidential_loss(torch.tensor([[-6.0, 6.0]] * 2), target)
    assert torch.isfinite(right) and right < wrong
