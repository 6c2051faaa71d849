"""Shipped scenario files (YAML), installed as package data of continual_ft.scenarios."""
