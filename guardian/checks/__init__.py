"""The request checks that hold no data: content filters, rate limits, anomaly detectors and
their alerts, sessions."""
