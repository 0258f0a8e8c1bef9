// A real OpenID Connect provider (panva's oidc-provider) on loopback for the integration tests.
//
// Usage: node server.mjs <config.json>
// config.json: {"port": N, "audience": "...", "resource": "urn:...", "scope": "...",
//               "jwks": {"keys": [private JWKs, the signing key first]},
//               "clients": [{"client_id", "client_secret", "groups": [...]}]}
// Access tokens are JWTs (RFC 9068) for the resource, signed with the first key; the
// client_credentials and device authorization grants are enabled. Prints "ready <issuer>".
import { readFileSync } from 'node:fs';
import Provider from 'oidc-provider';

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const issuer = `http://127.0.0.1:${config.port}`;
const groups = Object.fromEntries(config.clients.map((c) => [c.client_id, c.groups || []]));

const provider = new Provider(issuer, {
  jwks: config.jwks,
  clients: config.clients.map((c) => ({
    client_id: c.client_id,
    client_secret: c.client_secret,
    grant_types: ['client_credentials', 'urn:ietf:params:oauth:grant-type:device_code'],
    redirect_uris: [],
    response_types: [],
    token_endpoint_auth_method: 'client_secret_post',
  })),
  scopes: ['openid', ...config.scope.split(' ')],
  features: {
    clientCredentials: { enabled: true },
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true },
    resourceIndicators: {
      enabled: true,
      defaultResource: () => config.resource,
      getResourceServerInfo: () => ({
        scope: config.scope,
        audience: config.audience,
        accessTokenFormat: 'jwt',
        accessTokenTTL: 600,
        jwt: { sign: { alg: 'RS256' } },
      }),
    },
  },
  extraTokenClaims: (ctx, token) => ({ groups: groups[token.clientId] || [] }),
});
provider.proxy = false;

provider.listen(config.port, '127.0.0.1', () => {
  console.log(`ready ${issuer}`);
});
