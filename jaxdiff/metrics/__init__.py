"""Image metrics: FID/KID/IS/PRDC on Inception features, CLIP score and CMMD, CopyScope, and the shapes judges."""
