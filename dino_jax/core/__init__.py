"""The training core, pure JAX: the configuration, the generic train step and its optimizer,
schedules and the methods' losses (DINO's; DINOv2's Sinkhorn-Knopp, iBOT and KoLeo), the device
mesh and sharding rules, the platform's layers, and the laws and device half of the multi-crop
augmentation. No checkpointing, data loading, image libraries or command lines: those build on
it."""
