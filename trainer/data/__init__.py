"""Training data: image sets, class images, latent and text caches, the order images are shown in."""
