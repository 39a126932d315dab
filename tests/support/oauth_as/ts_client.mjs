// A remote agent built on the TypeScript MCP SDK (@modelcontextprotocol/sdk), OAuth only, for
// agent-guardian's tests. It knows the gateway's URL and its own client credentials, nothing
// else: the SDK's transport meets the gateway's 401, reads the protected resource metadata it
// names (RFC 9728), finds the authorization server there, gets a token for this resource
// (client_credentials, RFC 8707) and retries. Then it lists the tools, stores a memory and
// searches for it (lexical), whatever its token allows: a refused call is reported, not fatal.
//
// Usage: node ts_client.mjs GATEWAY_URL CREDENTIALS.json CONTENT QUERY
//   CREDENTIALS.json is {"client_id": "...", "client_secret": "...", "issuer": "http://...",
//   "scope": "memory:read memory:write"}: issuer is the authorization server the client trusts
//   with its secret (the SDK's expectedIssuer), not where it looks: the gateway's metadata must
//   lead it there. scope is what it asks for (this SDK's client_credentials provider sends only
//   a configured scope, never the one the 401 names); the authorization server grants at most
//   what the client may have.
// It prints one JSON line (the secret and the token never appear in it):
//   {"protocolVersion", "server", "authorizationServer", "tokens", "tools", "store", "search"}
// and exits 0; on a failure to connect or a protocol error it prints the error on stderr and exits 1.
import { readFileSync } from 'node:fs';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { ClientCredentialsProvider } from '@modelcontextprotocol/sdk/client/auth-extensions.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';

/** The SDK's client-credentials provider, remembering where discovery led and how many tokens it got. */
class RecordingProvider extends ClientCredentialsProvider {
  authorizationServer = null;
  tokensIssued = 0;

  saveDiscoveryState(state) {
    this.authorizationServer = state.authorizationServerUrl;
  }

  saveTokens(tokens) {
    this.tokensIssued += 1;
    super.saveTokens(tokens);
  }
}

/** What a tool call answered: its error flag, its text and its structured content. */
function outcome(result) {
  const text = (result.content ?? [])
    .filter((part) => part.type === 'text')
    .map((part) => part.text)
    .join('\n');
  return { isError: Boolean(result.isError), text, structuredContent: result.structuredContent ?? null };
}

async function main() {
  const [url, credentialsFile, content, query] = process.argv.slice(2);
  if (!url || !credentialsFile || !content || !query) {
    throw new Error('usage: node ts_client.mjs GATEWAY_URL CREDENTIALS.json CONTENT QUERY');
  }
  const credentials = JSON.parse(readFileSync(credentialsFile, 'utf8'));
  const authProvider = new RecordingProvider({
    clientId: credentials.client_id,
    clientSecret: credentials.client_secret,
    expectedIssuer: credentials.issuer,
    scope: credentials.scope,
    clientName: 'agent-guardian-ts-client',
  });
  const transport = new StreamableHTTPClientTransport(new URL(url), { authProvider });
  const client = new Client({ name: 'agent-guardian-ts-client', version: '1.0.0' });
  await client.connect(transport);
  try {
    const { tools } = await client.listTools();
    const store = outcome(await client.callTool({ name: 'memory_store', arguments: { content } }));
    const search = outcome(await client.callTool({ name: 'memory_search', arguments: { query, mode: 'lexical' } }));
    const report = {
      protocolVersion: transport.protocolVersion,
      server: client.getServerVersion() ?? null,
      authorizationServer: authProvider.authorizationServer,
      tokens: authProvider.tokensIssued,
      tools: tools.map((tool) => tool.name).sort(),
      store,
      search,
    };
    console.log(JSON.stringify(report));
  } finally {
    await client.close();
  }
}

main().catch((error) => {
  console.error(`ts_client: ${error instanceof Error ? error.stack : String(error)}`);
  process.exit(1);
});
