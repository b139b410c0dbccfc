"""The evaluation maths, apart from the commands that run it: features of a frozen backbone,
the weighted k-NN vote, the linear probe, attention masks and their scores, and the principal
components of patch features (DINOv2's picture)."""
