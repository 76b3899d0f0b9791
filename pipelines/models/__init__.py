"""Network definitions: the conditional GAN family and the conditional U-Net."""
