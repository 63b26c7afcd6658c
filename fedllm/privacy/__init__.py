"""Record-level differential privacy on the device: DP-SGD wiring (engine), the
on-device ledger, accounting, and the reports an auditor recomputes."""
