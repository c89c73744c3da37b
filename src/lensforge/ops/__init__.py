"""Image perturbations shared by training and stress testing.

Common corruptions (:mod:`lensforge.ops.corruptions`) and adversarial attacks
(:mod:`lensforge.ops.attacks`) are used as augmentation and adversarial training by
:mod:`lensforge.train`, and as tests by :mod:`lensforge.stress`; they sit below both.
"""
