"""kerasllm's first-party plugins, installed as ``kerasllm_plugins``.

Each module is one plugin, registered in setup.cfg under the ``kerasllm``
entry-point group exactly as a third-party plugin would be.
"""
