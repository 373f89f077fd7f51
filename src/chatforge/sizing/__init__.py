"""Sizing: what a model needs (parameters, memory, speed, compute) and the largest preset that fits
the machine it runs on; `chatforge plan`.

    machine.py  this machine: memory, and matmul rates and bandwidth from a second of calibration
    plan.py     plan(): a model (preset, config, HF id or a parameter count) against that machine
"""
