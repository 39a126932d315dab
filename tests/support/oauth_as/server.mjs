// A real OAuth 2.1 authorization server for agent-guardian's tests (panva/oidc-provider),
// on loopback only. It issues JWT access tokens (RFC 9068, typ at+jwt) by the
// client_credentials grant, bound to the resource the client names (RFC 8707), with the
// scopes each client is allowed and the lifetime each client is given. Its signing keys
// are the test's: the first signs, all are published at /jwks (so a test rotates them by
// restarting it on the same port with other keys).
//
// Usage: node server.mjs CONFIG.json   where CONFIG is
//   {"port": 0, "resources": ["http://127.0.0.1:8765/mcp", ...],
//    "clients": {"writer": {"secret": "...", "scope": "memory:read memory:write", "ttl": 300}, ...},
//    "keys": [<private JWK with kid and alg ES256>, ...]}
// It prints one JSON line, {"issuer": "http://127.0.0.1:PORT"}, once it listens.
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import Provider, { errors } from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const server = createServer();
server.listen(config.port || 0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    jwks: { keys: config.keys },
    clients: Object.entries(config.clients).map(([id, client]) => ({
      client_id: id,
      client_secret: client.secret,
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
      token_endpoint_auth_method: 'client_secret_basic',
    })),
    features: {
      clientCredentials: { enabled: true },
      devInteractions: { enabled: false },
      resourceIndicators: {
        enabled: true,
        defaultResource: () => config.resources[0],
        useGrantedResource: () => true,
        getResourceServerInfo: (ctx, resource, client) => {
          if (!config.resources.includes(resource)) throw new errors.InvalidTarget();
          const allowed = config.clients[client.clientId];
          return {
            scope: allowed.scope,
            audience: resource,
            accessTokenFormat: 'jwt',
            accessTokenTTL: allowed.ttl,
            jwt: { sign: { alg: 'ES256' } },
          };
        },
      },
    },
    cookies: { keys: ['test-only-not-a-secret'] },
    clientDefaults: { id_token_signed_response_alg: 'ES256' },
  });
  server.on('request', provider.callback());
  console.log(JSON.stringify({ issuer }));
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
