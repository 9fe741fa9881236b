"""Placeholder so that `pytorch_fid.fid_score` (which imports torchvision.transforms for its image-folder
loader) imports; the parity tests call only its `calculate_frechet_distance`, which does not use it."""
