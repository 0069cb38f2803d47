"""Integrations with other toolkits, each a submodule with its own extra.

* :mod:`torchquant.integrations.flower`: federated quantization-aware training with
  Flower (extra ``[flower]``): a ``ClientApp`` / ``ServerApp`` pair, compressed client
  updates and observer aggregation.
* :mod:`torchquant.integrations.speechbrain`: SpeechBrain models and its ``Brain`` training
  loop (extra ``[speechbrain]``): quantized lobes, QAT with checkpoints, an offline
  spoken-digits task.

``import torchquant.integrations`` imports no optional package; each submodule imports
its toolkit when it is imported.
"""
