"""Prometheus metrics, on a registry of their own so that two sidecars in one process never mix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.serving = Gauge(
            "sidecar_serving", "1 while the probe answers 200, 0 otherwise.", registry=self.registry
        )
        self.polls = Counter(
            "sidecar_imds_polls",
            "Scheduled Events polls, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.poll_seconds = Histogram(
            "sidecar_imds_poll_seconds",
            "Duration of Scheduled Events polls.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
            registry=self.registry,
        )
        self.last_success = Gauge(
            "sidecar_imds_last_success_timestamp_seconds",
            "When Scheduled Events last answered.",
            registry=self.registry,
        )
        self.incarnation = Gauge(
            "sidecar_imds_document_incarnation",
            "DocumentIncarnation of the last document read.",
            registry=self.registry,
        )
        self.events = Gauge(
            "sidecar_events", "Events in the document, by phase.", ["phase"], registry=self.registry
        )
        self.app_connections = Gauge(
            "sidecar_app_connections",
            "Established connections to SIDECAR_APP_PORTS while draining; -1 when not counted.",
            registry=self.registry,
        )
        self.app_connections.set(-1)
        self.app_healthy = Gauge(
            "sidecar_app_healthy",
            "1 while SIDECAR_APP_HEALTH_URL answers 2xx, 0 otherwise (1 when not configured).",
            registry=self.registry,
        )
        self.app_healthy.set(1)
        self.approvals = Counter(
            "sidecar_approvals",
            "Approval POSTs, by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        self.state_writes = Counter(
            "sidecar_state_writes",
            "State file writes, by outcome.",
            ["outcome"],
            registry=self.registry,
        )

        self.arm_operations = Counter(
            "sidecar_arm_operations",
            "Backend-pool actions through ARM (discover, remove, restore), by outcome.",
            ["action", "outcome"],
            registry=self.registry,
        )
        self.pools_out = Gauge(
            "sidecar_backend_pools_out",
            "Backend-pool memberships this sidecar removed and has not put back yet.",
            registry=self.registry,
        )

        self.task_failures = Counter(
            "sidecar_task_failures",
            "Background tasks that failed and were started again, by task.",
            ["task"],
            registry=self.registry,
        )
        self.probe_connections_shed = Counter(
            "sidecar_probe_connections_shed",
            "Connections to the probe port closed to stay under the cap (oldest first).",
            registry=self.registry,
        )

        self.hooks = Counter(
            "sidecar_hooks",
            "Drain and undrain hook calls, by phase and outcome.",
            ["phase", "outcome"],
            registry=self.registry,
        )

        self.webhooks = Counter(
            "sidecar_webhook_deliveries",
            "Webhook delivery attempts, by outcome (ok, error, dropped).",
            ["outcome"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
