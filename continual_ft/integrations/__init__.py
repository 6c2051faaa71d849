"""Bridges to other libraries, each imported only when its module is (`continual_ft.integrations.avalanche`)."""
