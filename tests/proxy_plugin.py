"""A proxy.py plugin for the egress tests: names under `.internal` resolve, at the proxy only, to 127.0.0.1.

So a provider host name resolves only through the proxy, and nothing the proxy is asked for
leaves this machine: every other name resolves to 127.0.0.1 too, never through DNS.
"""

from proxy.http.proxy import HttpProxyBasePlugin


class LoopbackNames(HttpProxyBasePlugin):
    def resolve_dns(self, host, port):  # noqa: ANN001, ANN201 - proxy.py's hook
        return "127.0.0.1", None

    def before_upstream_connection(self, request):  # noqa: ANN001, ANN201
        return request

    def handle_client_request(self, request):  # noqa: ANN001, ANN201
        return request

    def handle_upstream_chunk(self, chunk):  # noqa: ANN001, ANN201
        return chunk

    def on_upstream_connection_close(self):  # noqa: ANN201
        pass
