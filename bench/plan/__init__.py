"""``bench plan``: what a command will do and the GPU memory it will need, without loading a weight.

* ``bench.plan.arch``: the real architectures (configs in ``configs/``) built on the meta device;
* ``bench.plan.profile``: activation memory measured from them (meta tensors, emulated CUDA autocast);
* ``bench.plan.store``: the measured profiles kept (``profiles.json`` for the presets, the cache for the rest);
* ``bench.plan.work``: what a method's ``plan`` hook returns (UNet passes per micro-batch, round, preparation);
* ``bench.plan.planner``: the plan of a ``bench run`` / ``train`` / ``eval`` command and its rendering.
"""
