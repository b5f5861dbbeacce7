"""Data: decoding images, preprocessing transforms, datasets and their validation, training augmentation."""
