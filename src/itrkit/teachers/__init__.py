"""Teacher features for CUSA: offline extraction into memory-light, checked feature stores."""

from itrkit.teachers.extract import extract_teacher, resolve_teacher, teach
from itrkit.teachers.mpnet import install_mpnet, mpnet_path
from itrkit.teachers.reduce import PCA, pool_tokens
from itrkit.teachers.store import FeatureStore, StoreWriter

__all__ = ["PCA", "FeatureStore", "StoreWriter", "extract_teacher", "install_mpnet", "mpnet_path", "pool_tokens",
           "resolve_teacher", "teach"]
