"""Evaluation of trained backbones: the commands (`python -m dino_jax.eval.knn`, `.linear`, and
their shared `cli`), the maths they run (`maths/`: features, the k-NN vote, the linear probe,
attention masks), and the monitors that score the teacher during training, with their figures."""
