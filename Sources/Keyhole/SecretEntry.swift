public import KeyholePolicy

/// What to do when a placeholder is sent where it may not be substituted (a host that is
/// not allowed, a site `SecretInjection` switches off, an identity that does not hold).
///
/// - `block`: the request is dropped and the guest's connection reset. The default.
/// - `blockAndLog`: the same, and a warning audit event on the host.
/// - `blockAndTerminate`: the same, an error event, and the whole sandbox is shut down.
///
/// A secret's own action and the network's combine: the stricter one applies.
public typealias ViolationAction = KeyholePolicy.ViolationAction

/// Where the proxy may put a secret's real value in place of its placeholder. Each site
/// not switched on is a violation when the placeholder shows up there.
public struct SecretInjection: Sendable, Hashable {
    /// Anywhere in a header value. Default `true`.
    public var headers: Bool
    /// Inside the base64 `user:password` of `Authorization: Basic`. Default `true`.
    public var basicAuth: Bool
    /// In the request target's query (the value is inserted percent-encoded). Default `false`.
    public var queryParams: Bool
    /// In the request body; `Content-Length` is rewritten. Default `false`.
    public var body: Bool

    public init(headers: Bool = true, basicAuth: Bool = true, queryParams: Bool = false, body: Bool = false) {
        self.headers = headers
        self.basicAuth = basicAuth
        self.queryParams = queryParams
        self.body = body
    }
}

/// One secret: the guest gets `placeholder` in `envVar`; the proxy swaps in `value` only in
/// requests to an allowed host whose identity it verified. Usually made by `SecretBuilder`.
///
/// `value` stays on the host. Every textual form of an entry (`description`, `dump`,
/// string interpolation) shows it as `<redacted>`.
public struct SecretEntry: Sendable, Hashable, CustomStringConvertible, CustomDebugStringConvertible, CustomReflectable {
    /// The guest environment variable that receives the placeholder.
    public var envVar: String
    /// The real value. Never enters the guest, a log or an error message.
    public var value: String
    /// The placeholder; `nil` means `$MSB_<envVar>`.
    public var placeholder: String?
    /// Hosts the value may go to, matched exactly (ASCII case-insensitive, trailing dot ignored).
    public var allowedHosts: [String]
    /// `*.domain` patterns: one or more labels under the domain, never the domain itself.
    public var allowedHostPatterns: [String]
    /// Any host at all. Dangerous: the guest chooses where the value goes.
    public var allowAnyHost: Bool
    /// Substitute only over TLS whose name the upstream's certificate proves. Default `true`.
    public var requireTlsIdentity: Bool
    public var injection: SecretInjection
    /// Hosts the placeholder may reach unchanged (never the value), such as an LLM API that
    /// receives an agent's transcript: not a violation, audited as `passed-through`.
    public var passthroughHosts: [String]
    public var passthroughHostPatterns: [String]
    /// This secret's own violation action; the stricter of it and the network's applies.
    public var onViolation: ViolationAction?

    public init(
        envVar: String, value: String, placeholder: String? = nil, allowedHosts: [String] = [], allowedHostPatterns: [String] = [],
        allowAnyHost: Bool = false, requireTlsIdentity: Bool = true, injection: SecretInjection = SecretInjection(),
        passthroughHosts: [String] = [], passthroughHostPatterns: [String] = [], onViolation: ViolationAction? = nil
    ) {
        self.envVar = envVar
        self.value = value
        self.placeholder = placeholder
        self.allowedHosts = allowedHosts
        self.allowedHostPatterns = allowedHostPatterns
        self.allowAnyHost = allowAnyHost
        self.requireTlsIdentity = requireTlsIdentity
        self.injection = injection
        self.passthroughHosts = passthroughHosts
        self.passthroughHostPatterns = passthroughHostPatterns
        self.onViolation = onViolation
    }

    /// The placeholder the guest sees.
    public var effectivePlaceholder: String { placeholder ?? Secret.defaultPlaceholder(forEnv: envVar) }

    public var description: String {
        "SecretEntry(envVar: \(envVar), placeholder: \(effectivePlaceholder), value: \(SecretValue.redaction), allowedHosts: \(allowedHosts), allowedHostPatterns: \(allowedHostPatterns))"
    }

    public var debugDescription: String { description }

    public var customMirror: Mirror {
        Mirror(
            self,
            children: [
                "envVar": envVar, "value": SecretValue.redaction, "placeholder": effectivePlaceholder, "allowedHosts": allowedHosts,
                "allowedHostPatterns": allowedHostPatterns,
            ])
    }

    /// The entry in the policy file's own keys, for `PolicyLoader` to validate.
    var document: PolicyDocument {
        var entries: [(key: String, value: PolicyDocument)] = [("env", .string(envVar)), ("value", .string(value))]
        if let placeholder { entries.append(("placeholder", .string(placeholder))) }
        if !allowedHosts.isEmpty { entries.append(("allow_hosts", .strings(allowedHosts))) }
        if !allowedHostPatterns.isEmpty { entries.append(("allow_host_patterns", .strings(allowedHostPatterns))) }
        if allowAnyHost { entries.append(("allow_any_host_dangerous", .bool(true))) }
        if !requireTlsIdentity { entries.append(("require_tls_identity", .bool(false))) }
        entries.append(
            (
                "inject",
                .map([
                    ("headers", .bool(injection.headers)), ("basic_auth", .bool(injection.basicAuth)), ("query", .bool(injection.queryParams)),
                    ("body", .bool(injection.body)),
                ])
            ))
        if !passthroughHosts.isEmpty { entries.append(("passthrough_hosts", .strings(passthroughHosts))) }
        if !passthroughHostPatterns.isEmpty { entries.append(("passthrough_host_patterns", .strings(passthroughHostPatterns))) }
        if let onViolation { entries.append(("on_violation", .string(onViolation.rawValue))) }
        return .map(entries)
    }
}

/// Builds a `SecretEntry`; used inside `SandboxBuilder.secret { … }` and
/// `NetworkBuilder.secret { … }`. Every setter returns the same builder, so calls chain:
///
/// ```swift
/// .secret { $0.env("GITHUB_TOKEN").value(token).allowHost("api.github.com").allowHostPattern("*.githubusercontent.com") }
/// ```
public final class SecretBuilder {
    private(set) var entry = SecretEntry(envVar: "", value: "")

    public init() {}

    /// The environment variable to expose the placeholder under. Required.
    @discardableResult public func env(_ varName: String) -> SecretBuilder { entry.envVar = varName; return self }
    /// The real secret value (stays on the host). Required.
    @discardableResult public func value(_ value: String) -> SecretBuilder { entry.value = value; return self }
    /// A custom placeholder; `$MSB_<ENV_VAR>` when omitted.
    @discardableResult public func placeholder(_ placeholder: String) -> SecretBuilder { entry.placeholder = placeholder; return self }
    /// Allows substitution to this host (exact match).
    @discardableResult public func allowHost(_ host: String) -> SecretBuilder { entry.allowedHosts.append(host); return self }
    /// Allows substitution to any host matching `*.domain`.
    @discardableResult public func allowHostPattern(_ pattern: String) -> SecretBuilder { entry.allowedHostPatterns.append(pattern); return self }
    /// Permits substitution to any host. Acknowledge the risk explicitly.
    @discardableResult public func allowAnyHostDangerous(_ enabled: Bool = true) -> SecretBuilder { entry.allowAnyHost = enabled; return self }
    /// Requires a verified TLS identity before substituting. Default `true`.
    @discardableResult public func requireTlsIdentity(_ enabled: Bool) -> SecretBuilder { entry.requireTlsIdentity = enabled; return self }
    /// Substitution in HTTP headers. Default `true`.
    @discardableResult public func injectHeaders(_ enabled: Bool) -> SecretBuilder { entry.injection.headers = enabled; return self }
    /// Substitution in HTTP Basic auth credentials. Default `true`.
    @discardableResult public func injectBasicAuth(_ enabled: Bool) -> SecretBuilder { entry.injection.basicAuth = enabled; return self }
    /// Substitution in URL query parameters. Default `false`.
    @discardableResult public func injectQuery(_ enabled: Bool) -> SecretBuilder { entry.injection.queryParams = enabled; return self }
    /// Substitution in the request body (`Content-Length` is rewritten). Default `false`.
    @discardableResult public func injectBody(_ enabled: Bool) -> SecretBuilder { entry.injection.body = enabled; return self }
    /// Lets the placeholder reach this host unchanged (never the value).
    @discardableResult public func passthroughHost(_ host: String) -> SecretBuilder { entry.passthroughHosts.append(host); return self }
    /// Lets the placeholder reach hosts matching `*.domain` unchanged (never the value).
    @discardableResult public func passthroughHostPattern(_ pattern: String) -> SecretBuilder {
        entry.passthroughHostPatterns.append(pattern)
        return self
    }
    /// This secret's own violation action (the stricter of it and the network's applies).
    @discardableResult public func onViolation(_ action: ViolationAction) -> SecretBuilder { entry.onViolation = action; return self }

    /// The entry, as it stands. Checked when the sandbox is created, with the policy file's rules.
    public func build() -> SecretEntry { entry }
}

/// What the guest gets for a blocked request: `.reset` (the default) or `.http`.
public typealias BlockResponse = KeyholePolicy.BlockResponse
