"""Models and learning: patch encoders (timm registry) and the embedding pipeline; MIL models,
training, metrics, heatmaps and export come next. Import the submodules (they import torch)."""
