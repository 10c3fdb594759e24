"""The aggregator: collects generalist weights from devices and sends back their average (issue 3)."""
