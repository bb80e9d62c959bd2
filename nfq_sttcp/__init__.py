"""ST-TCP (server fault-tolerant TCP) for stock Linux through iptables and NFQUEUE."""
__version__ = "0.1.0"
