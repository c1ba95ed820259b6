// Drives the real npm `dynamics-web-api` client (pinned in package.json) through the
// gateway, as an application would. Run by tests/dynamics_web_api.rs with GATEWAY_URL and
// CALLER_TOKEN set. Exits non-zero with a message on the first mismatch; on success prints
// one JSON summary line (the last line of stdout) that the Rust test checks again.
//
// Never print CALLER_TOKEN: errors are reported by status, code and message only.

import { DynamicsWebApi } from "dynamics-web-api";

const GATEWAY_URL = process.env.GATEWAY_URL;
const CALLER_TOKEN = process.env.CALLER_TOKEN;
if (!GATEWAY_URL || !CALLER_TOKEN) {
  fail("GATEWAY_URL and CALLER_TOKEN must be set");
}
const API = `${GATEWAY_URL}/api/data/v9.2/`;
const GUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
// Names unique to this run, so assertions never depend on the stand-in's seed rows.
const RUN = `dwa-${process.pid}-${Date.now()}`;

function fail(message) {
  process.stderr.write(`client.mjs: ${message}\n`);
  process.exit(1);
}

function check(condition, message) {
  if (!condition) fail(message);
}

function equal(actual, expected, what) {
  const a = JSON.stringify(actual);
  const e = JSON.stringify(expected);
  check(a === e, `${what}: expected ${e}, got ${a}`);
}

// What a thrown client error says, without anything that could carry a credential.
function describe(error) {
  return JSON.stringify({
    status: error?.status,
    code: error?.code,
    message: error?.message,
  });
}

async function step(name, fn) {
  try {
    return await fn();
  } catch (error) {
    fail(`${name} threw ${describe(error)}`);
  }
}

const config = {
  serverUrl: GATEWAY_URL,
  dataApi: { version: "9.2" },
  // The caller's own token: the gateway validates it and never forwards it.
  onTokenRefresh: async () => CALLER_TOKEN,
};
const api = new DynamicsWebApi(config);
// Without propagateErrors the client swallows a 412 on an If-Match update and returns
// false; with it the error reaches the app, which is what this test wants to see.
const strict = new DynamicsWebApi({ ...config, propagateErrors: true });

const summary = { ok: true };

// 1. create: 204 + OData-EntityId → id; return=representation → 201 body.
const createdId = await step("create", () =>
  api.create({ collection: "accounts", data: { name: `${RUN}-created` } }),
);
check(
  typeof createdId === "string" && GUID.test(createdId),
  `create returned ${JSON.stringify(createdId)}, expected the GUID from OData-EntityId`,
);
const represented = await step("create with returnRepresentation", () =>
  api.create({
    collection: "accounts",
    data: { name: `${RUN}-represented` },
    returnRepresentation: true,
  }),
);
check(represented && GUID.test(represented.accountid ?? ""), "201 body has an accountid");
equal(represented.name, `${RUN}-represented`, "201 body name");
const repContext = represented.oDataContext ?? represented["@odata.context"];
check(
  typeof repContext === "string" && repContext.startsWith(`${API}$metadata#accounts`),
  `201 body @odata.context should name the gateway (${API}), got ${repContext}`,
);
summary.created = { id: createdId, representedId: represented.accountid, context: repContext };

// 2. retrieve; update with If-Match: *; a stale ETag is a 412 the app sees.
const before = await step("retrieve", () =>
  api.retrieve({ collection: "accounts", key: createdId, select: ["name"] }),
);
equal(before.name, `${RUN}-created`, "retrieved name");
equal(before.accountid, createdId, "retrieved id");
const staleEtag = before["@odata.etag"];
check(/^W\/"\d+"$/.test(staleEtag ?? ""), `retrieve gave ETag ${staleEtag}`);
const updated = await step("update with ifmatch *", () =>
  api.update({
    collection: "accounts",
    key: createdId,
    data: { name: `${RUN}-updated` },
    ifmatch: "*",
  }),
);
equal(updated, true, "update with If-Match: * result");
const after = await step("retrieve after update", () =>
  api.retrieve({ collection: "accounts", key: createdId, select: ["name"] }),
);
equal(after.name, `${RUN}-updated`, "name after update");
check(after["@odata.etag"] !== staleEtag, "the update changed the ETag");
let staleStatus = null;
let staleCode = null;
try {
  await strict.update({
    collection: "accounts",
    key: createdId,
    data: { name: `${RUN}-lost-update` },
    ifmatch: staleEtag,
  });
} catch (error) {
  staleStatus = error?.status ?? null;
  staleCode = error?.code ?? null;
}
equal(staleStatus, 412, "update with a stale ETag (propagateErrors) status");
// The library's default: the same 412 turned into `false`.
const lenient = await step("stale update (default)", () =>
  api.update({
    collection: "accounts",
    key: createdId,
    data: { name: `${RUN}-lost-update` },
    ifmatch: staleEtag,
  }),
);
equal(lenient, false, "update with a stale ETag (default) result");
summary.update = { staleStatus, staleCode, etagBefore: staleEtag, etagAfter: after["@odata.etag"] };

// 3. paging with odata.maxpagesize, by hand and with retrieveAll; $count as text/plain.
const everything = await step("retrieveMultiple without paging", () =>
  api.retrieveMultiple({ collection: "accounts", select: ["name"] }),
);
const allIds = everything.value.map((r) => r.accountid).sort();
check(allIds.length >= 5, `expected at least 5 accounts, got ${allIds.length}`);
// include-annotations rides in the same Prefer header as odata.maxpagesize.
const pageRequest = {
  collection: "accounts",
  select: ["name"],
  maxPageSize: 2,
  includeAnnotations: "OData.Community.Display.V1.FormattedValue",
};
const firstPage = await step("retrieveMultiple page 1", () => api.retrieveMultiple(pageRequest));
equal(firstPage.value.length, 2, "page 1 size");
const nextLink = firstPage.oDataNextLink;
check(
  typeof nextLink === "string" && nextLink.startsWith(`${API}accounts?`),
  `@odata.nextLink should name the gateway (${API}), got ${nextLink}`,
);
check(nextLink.includes("$skiptoken="), `nextLink has a $skiptoken: ${nextLink}`);
const paged = [...firstPage.value];
let link = nextLink;
let pages = 1;
while (link) {
  check(link.startsWith(API), `nextLink on page ${pages} names ${link}`);
  const page = await step(`retrieveMultiple page ${pages + 1}`, () =>
    api.retrieveMultiple(pageRequest, link),
  );
  paged.push(...page.value);
  link = page.oDataNextLink;
  pages += 1;
  check(pages < 100, "paging does not end");
}
equal(paged.map((r) => r.accountid).sort(), allIds, "rows followed through nextLinks");
const all = await step("retrieveAll", () =>
  api.retrieveAll(pageRequest),
);
equal(all.value.map((r) => r.accountid).sort(), allIds, "rows from retrieveAll");
// No filter: GET accounts/$count, answered as text/plain.
const count = await step("count", () => api.count({ collection: "accounts" }));
equal(count, allIds.length, "count ($count, text/plain)");
// With a filter: $count=true and @odata.count.
const filteredCount = await step("count with filter", () =>
  api.count({ collection: "accounts", filter: `name eq '${RUN}-updated'` }),
);
equal(filteredCount, 1, "count with filter (@odata.count)");
summary.paging = { pages, rows: paged.length, count, filteredCount };

// 4. A GET longer than 2000 characters: the client silently sends POST $batch instead.
const wanted = [`${RUN}-updated`, `${RUN}-represented`];
const clauses = [...wanted.map((n) => `name eq '${n}'`)];
for (let i = 0; clauses.join(" or ").length < 2600; i += 1) {
  clauses.push(`name eq '${RUN}-absent-${i}'`);
}
const longFilter = clauses.join(" or ");
const longResult = await step("retrieveMultiple with a long filter", () =>
  api.retrieveMultiple({ collection: "accounts", select: ["name"], filter: longFilter }),
);
check(longResult && Array.isArray(longResult.value), "long query returned a value array");
equal(longResult.value.map((r) => r.name).sort(), [...wanted].sort(), "rows of the long query");
summary.longQuery = { filterLength: longFilter.length, rows: longResult.value.length };

// 6 (needed by 5). @odata.bind with an absolute gateway URL in a create body.
const contactId = await step("create contact with @odata.bind", () =>
  api.create({
    collection: "contacts",
    data: {
      lastname: `${RUN}-contact`,
      "parentcustomerid_account@odata.bind": `${API}accounts(${createdId})`,
    },
  }),
);
check(GUID.test(contactId ?? ""), `contact create returned ${JSON.stringify(contactId)}`);
summary.bind = { contactId, target: createdId };

// 5. An explicit batch: a create in a change set, a retrieve, and an associate whose body
// carries an absolute @odata.id naming the gateway.
api.startBatch();
api.create({ collection: "accounts", data: { name: `${RUN}-batched` }, contentId: "1" });
api.associate({
  collection: "accounts",
  primaryKey: createdId,
  relationshipName: "contact_customer_accounts",
  relatedCollection: "contacts",
  relatedKey: contactId,
});
// $orderby goes into the part's request line with a raw space, as this client writes it.
api.retrieveMultiple({
  collection: "accounts",
  select: ["name"],
  filter: `name eq '${RUN}-updated' or name eq '${RUN}-represented'`,
  orderBy: ["name asc"],
});
const batch = await step("executeBatch", () => api.executeBatch());
check(Array.isArray(batch) && batch.length === 3, `batch returned ${JSON.stringify(batch)}`);
const [batchCreatedId, associated, batchRetrieved] = batch;
check(
  typeof batchCreatedId === "string" && GUID.test(batchCreatedId),
  `batched create returned ${JSON.stringify(batchCreatedId)}`,
);
check(
  !(associated instanceof Error) && associated?.status === undefined,
  `associate in batch failed: ${describe(associated)}`,
);
check(
  batchRetrieved && Array.isArray(batchRetrieved.value),
  `batched retrieve returned ${JSON.stringify(batchRetrieved)}`,
);
equal(
  batchRetrieved.value.map((r) => r.name).sort(),
  [`${RUN}-represented`, `${RUN}-updated`],
  "rows of the batched retrieve",
);
const batchedRow = await step("retrieve the batched create", () =>
  api.retrieve({ collection: "accounts", key: batchCreatedId, select: ["name"] }),
);
equal(batchedRow.name, `${RUN}-batched`, "name of the record created in the batch");
summary.batch = {
  createdId: batchCreatedId,
  associated: { account: createdId, contact: contactId },
  retrievedRows: batchRetrieved.value.length,
};

summary.run = RUN;
process.stdout.write(`${JSON.stringify(summary)}\n`);
