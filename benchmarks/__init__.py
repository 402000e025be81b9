"""Training-overhead benchmarks: what dropout after every activation costs per step.

Run from the repository root (the package is not installed with multidrop):

    python -m benchmarks --help
    python -m benchmarks                      # PyTorch: mlp and cnn, eager and compiled
    python -m benchmarks --quick              # a tiny MLP in a few seconds (what the tests run)

Modules: ``models`` (the Keras models and their dropout variants), ``twins``
(pure-PyTorch twins with nn.Dropout), ``timing`` (interleaved timing, the
device), ``report`` (markdown, JSON, PNG), ``run`` (the command line).
"""
