import json

from tornado.httpclient import AsyncHTTPClient

from blackgate import Command


class GetProfile(Command):
    command_key = 'get_profile'
    timeout = 1.0                  # the command's: the caller's fallback comes by then
    max_concurrent_requests = 50

    #: the profile service
    base_url = 'http://profile-service'

    def __init__(self, user_id):
        self.user_id = user_id

    async def run(self):
        response = await AsyncHTTPClient().fetch(
            '%s/users/%d' % (self.base_url, self.user_id),
            # The fetch's own timeout, below the command's: a stalled request ends
            # by itself and gives back its client slot, instead of being cancelled.
            connect_timeout=0.5, request_timeout=0.8)
        return json.loads(response.body)

    def fallback(self):
        return {}


def configure_http_client():
    """At start-up: as many client slots as the command may run calls at once."""
    AsyncHTTPClient.configure(None, max_clients=GetProfile.max_concurrent_requests)
