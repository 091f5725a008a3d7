// Validates KEDA objects (JSON, one array on stdin) against KEDA's own CRD schemas, as
// compiled by @kubernetes-models/keda from the CRDs of KEDA's v2.10.1 release manifest.
// Prints one line per object: "ok KIND NAME" or "error KIND NAME: MESSAGE". Exit 1 on any
// error. The CRD schemas type and require fields; like every CRD without
// additionalProperties they do not reject unknown field names (the API server prunes them).
"use strict";
const v1alpha1 = require("@kubernetes-models/keda/keda.sh/v1alpha1");

const docs = JSON.parse(require("fs").readFileSync(0, "utf8"));
let failed = 0;
for (const doc of docs) {
  const name = `${doc.kind} ${(doc.metadata || {}).name}`;
  const Model = doc.apiVersion === "keda.sh/v1alpha1" ? v1alpha1[doc.kind] : undefined;
  if (!Model) {
    console.log(`error ${name}: no KEDA schema for ${doc.apiVersion} ${doc.kind}`);
    failed++;
    continue;
  }
  try {
    new Model(doc).validate();
    console.log(`ok ${name}`);
  } catch (err) {
    console.log(`error ${name}: ${err.message}`);
    failed++;
  }
}
process.exit(failed ? 1 : 0);
