"""The drift room: everything that judges whether the stream still looks like the model's reference.

``divergence`` (PSI, Jensen-Shannon), ``reference`` (the manifest reference, the label-free accuracy estimate
and the per-window statistics), ``calibration`` (bootstrap thresholds), ``detector`` (the alarm state machine),
``monitor`` (the service: stats topic in, alerts and retrain requests out), ``lag`` (consumer lag from the
broker), ``check`` (``sentiment drift-check``: replay a file) and ``fit`` (``sentiment drift-fit``: fit a
package's accuracy estimator). Imports ``runtime`` and ``schemas`` only; never ``worker`` or ``training``.
"""
