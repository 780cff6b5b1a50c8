"""Training objectives shared by the trainers: SSIM, pixel and segmentation losses, the
pseudo-label predictor (an adversarial image critic)."""
