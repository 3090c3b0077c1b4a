"""Capture: a model (torch.export, with fx fallbacks) lowered into the IR.

Entry points: :func:`attnopt.frontend.capture.capture`, :func:`attnopt.frontend.capture.capture_program`,
:func:`attnopt.frontend.lower.lower_exported_program`.
"""
