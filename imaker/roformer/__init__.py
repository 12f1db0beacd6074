"""RoFormer source separation models (BS-RoFormer, Mel-Band RoFormer) in the ZFTurbo/UVR
checkpoint format: ``<name>.ckpt`` + ``<name>.yaml`` in a model folder. No Dagster.

    from imaker import roformer
    model = roformer.load(repo / "x.ckpt", repo / "x.yaml", device="cpu")
    stems = model.separate(wav)          # {stem: float32 (channels, samples)}
"""

from .config import (ARCHITECTURES, BS_ROFORMER, MEL_BAND_ROFORMER, RoformerConfig,
                     RoformerConfigError, TupleSafeLoader, load_yaml, read_config)
from .model import (Installed, RoformerError, RoformerModel, file_sha256, is_roformer, load,
                    model_files, read_state_dict, scan, window_starts)

__all__ = ["ARCHITECTURES", "BS_ROFORMER", "Installed", "MEL_BAND_ROFORMER", "RoformerConfig",
           "RoformerConfigError", "RoformerError", "RoformerModel", "TupleSafeLoader",
           "file_sha256", "is_roformer", "load", "load_yaml", "model_files", "read_config",
           "read_state_dict", "scan", "window_starts"]
