"""A small CT segmentation U-Net whose frozen encoder gives the DeepSim features."""
