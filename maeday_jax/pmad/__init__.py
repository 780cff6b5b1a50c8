"""PMAD (One-for-All: Proposal Masked Cross-Class Anomaly Detection, AAAI 2023): masks, flow, proposals."""  # noqa: E501
