"""Helpers for the controlplane and trainer test tiers: real etcd, kube-apiserver, kwok, MinIO and friends.

The servers are built from their Go modules by ``tests/testbin/build.sh``; this package finds them, starts them
on random loopback ports, and makes sure nothing outlives the test session.
"""
