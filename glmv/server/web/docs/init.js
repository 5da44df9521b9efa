// Starts Swagger UI on the server's own OpenAPI document (glmv /docs). Kept out of the page so
// the page's Content-Security-Policy can forbid inline script.
"use strict";
window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  // No request to the public validator service: the page must work offline.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
