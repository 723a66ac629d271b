"""The parts of ``bench/model_throughput.py``, one job per module.

- ``machine``: what we run on (device, precision, CPU name) and how busy the rest of the machine was meanwhile.
- ``timing``: the matmul peak, one training step, interleaved repetitions, and the statistics of ratios.
- ``workloads``: model sizes, the compared models and Quill's kernel variants, batches, FLOP counts.
- ``sections``: one measuring function per benchmark section; each returns plain data (JSON-ready dicts).
- ``peak_memory``: peak memory of training steps per Quill kernel variant, one subprocess per measurement.
- ``summary``: figures, ratios and verdicts computed from the measurements (what the JSON holds).
- ``tables``, ``chart``: the printed report and the PNG chart, from the summary alone.
"""
