"""Li & Fan's fully convolutional registration network with deep self-supervision."""
