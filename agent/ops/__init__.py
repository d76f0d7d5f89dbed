"""Operations: Prometheus metrics and systemd notifications."""
