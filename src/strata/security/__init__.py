"""Layer 6 services: egress policy now; keys, RBAC, audit and encryption join here."""
