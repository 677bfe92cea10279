"""Network building blocks shared by the learned registration stages."""
