"""Dataset readers (MVTec AD, MVTec 3D-AD RGB, plain folders) and synthetic data for tests and the demo."""

from dmad_core.data.readers import (
    IMAGE_EXTENSIONS,
    LAYOUTS,
    CategoryDataset,
    CorruptImageError,
    ImageRecord,
    detect_layout,
    list_images,
    load_image,
    load_mask,
    read_category,
    verify_image,
)
from dmad_core.data.synthetic import (
    DEFECT_TYPES,
    DEMO_HARD_CATEGORY,
    SUBTLE_DEFECT_TYPES,
    TEXTURES,
    add_defect,
    make_demo_dataset,
    make_normal_image,
    make_outlier_textures,
    make_synthetic_category,
)

__all__ = [
    "DEFECT_TYPES",
    "DEMO_HARD_CATEGORY",
    "SUBTLE_DEFECT_TYPES",
    "IMAGE_EXTENSIONS",
    "LAYOUTS",
    "TEXTURES",
    "CategoryDataset",
    "CorruptImageError",
    "ImageRecord",
    "add_defect",
    "detect_layout",
    "list_images",
    "load_image",
    "load_mask",
    "make_demo_dataset",
    "make_normal_image",
    "make_outlier_textures",
    "make_synthetic_category",
    "read_category",
    "verify_image",
]
