"""GPU kit stand-in for ``vllm.utils.network_utils`` (the real one imports zmq and psutil): the two
functions ``vllm.distributed.utils`` uses, as vLLM 0.32.0 writes them."""
import ipaddress


def is_valid_ipv6_address(address: str) -> bool:
    try:
        ipaddress.IPv6Address(address)
        return True
    except ValueError:
        return False


def get_tcp_uri(ip: str, port: int) -> str:
    if is_valid_ipv6_address(ip):
        return f"tcp://[{ip}]:{port}"
    return f"tcp://{ip}:{port}"
