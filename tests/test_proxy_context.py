"""HTTPProxy opens a request context per proxied request: its command's hooks run inside it."""
import pytest

from blackgate.context import current
from proxy_upstream import TEST_TIMEOUT, forward_to, gateway, install_pool, upstream  # noqa: F401

pytestmark = pytest.mark.gen_test(timeout=TEST_TIMEOUT)

#: (hook, the context it saw) of every proxied request
SEEN = []


@pytest.fixture
def seeing_proxy(upstream, gateway):  # noqa: F811
    SEEN.clear()
    install_pool('proxy')

    def before_request(self):
        SEEN.append(('before_request', current()))
        self.request['url'] = upstream.url + self.request['path']

    def after_response(self):
        SEEN.append(('after_response', current()))

    return gateway(forward_to(upstream.url, before_request=before_request,
                              after_response=after_response, buffer_body=True))


async def test_each_proxied_request_runs_in_a_context_of_its_own(seeing_proxy):
    for _ in range(2):
        response = await seeing_proxy.fetch('GET', '/a')
        assert response.status == 200
    assert [hook for hook, _ in SEEN] == ['before_request', 'after_response'] * 2
    contexts = [context for _, context in SEEN]
    assert all(context is not None for context in contexts)
    assert contexts[0] is contexts[1] and contexts[2] is contexts[3]
    assert contexts[0] is not contexts[2]
    assert current() is None   # the test's own context is untouched
