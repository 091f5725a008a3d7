"""Test and benchmark support: real model builders, fault injection, process harness.

Production code never imports this package except through the single fault-injection hook.
"""
