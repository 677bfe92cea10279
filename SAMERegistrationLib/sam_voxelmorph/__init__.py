"""SAM-VoxelMorph: the learned dense deformation stage of SAME (network, prediction, training)."""
