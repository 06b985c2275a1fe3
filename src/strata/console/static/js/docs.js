// Swagger UI over /openapi.json. The console's session cookie authenticates; its writes carry the CSRF token.
const csrf = () => (document.cookie.split("; ").find((c) => c.startsWith("strata_csrf=")) || "").slice(12);
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  requestInterceptor: (request) => {
    request.headers["X-CSRF-Token"] = csrf();
    return request;
  },
});
