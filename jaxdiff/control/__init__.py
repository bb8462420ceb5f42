"""ControlNet training on the runner with the UNet, VAE and text encoder frozen (`jaxdiff controlnet-train`)."""
