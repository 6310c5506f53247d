import KeyholePolicy
import NIOCore

/// The substitution decision: whether a placeholder found at a site may become its real
/// value here (identity, `inject` switches, forms), and the events that report it.
extension RewriterCore {
    mutating func decide(secret: Int, site: Site, form: PlaceholderForm) -> Decision {
        // Bound for one of the secret's passthrough hosts: the placeholder goes on as it is
        // (the raw placeholder: an encoded form decodes to the same text).
        if !secrets[secret].passthroughHosts.isEmpty, let host = requestHostName(), secrets[secret].passthroughHosts.allows(host) {
            let bit = UInt16(1) << (Self.bit(site) + 8)
            if reported[secret] & bit == 0 {
                reported[secret] |= bit
                pendingSubstitutionEvents.append((secret, site, true))
            }
            return .passThrough(ByteBuffer(bytes: secrets[secret].placeholder))
        }
        let inject = secrets[secret].inject
        let reason: ViolationReason?
        switch site {
        case .method, .path, .headerName, .trailer, .upgraded, .opaque:
            reason = .neverSubstituted
        case .header, .query, .basicAuth, .body, .websocket:
            if let denial = requestDenial.isEmpty ? connectionDenial[secret] : requestDenial[secret] {
                reason = denial
            } else {
                switch site {
                case .header:
                    reason = !inject.headers ? .injectionDisabled : (form == .raw ? nil : .encodedForm)
                case .basicAuth:
                    reason = !inject.basicAuth ? .injectionDisabled : nil
                case .query:
                    reason = !inject.query ? .injectionDisabled : (form == .jsonEscaped ? .encodedForm : nil)
                case .websocket:
                    reason = !inject.body ? .injectionDisabled : (form == .raw ? nil : .encodedForm)
                default:  // body
                    if !inject.body {
                        reason = .injectionDisabled
                    } else if head.contentEncoded {
                        reason = .contentEncoded
                    } else if form == .jsonEscaped || (form == .percentEncoded && !head.formBody) {
                        reason = .encodedForm
                    } else {
                        reason = nil
                    }
                }
            }
        }
        if let reason { return .failure(makeViolation(secret: secret, site: site, form: form, reason: reason)) }
        let bit = UInt16(1) << Self.bit(site)
        if reported[secret] & bit == 0 {
            reported[secret] |= bit
            pendingSubstitutionEvents.append((secret, site, false))
        }
        let percent = site == .query || (site == .body && head.formBody)
        return .success(percent ? percentValues[secret] : rawValues[secret])
    }


    enum Decision {
        case success(ByteBuffer)
        case failure(Violation)
        /// The placeholder goes on unchanged (these are its raw bytes).
        case passThrough(ByteBuffer)
    }

    /// The host the current request goes to: its `Host` (which equals the SNI on TLS), or the
    /// SNI outside a request (an upgraded stream).
    mutating func requestHostName() -> String? {
        if let host = currentSummary()?.host, !host.isEmpty { return HostName.normalize(host) }
        return identity.sni
    }

    static func bit(_ site: Site) -> UInt16 {
        switch site {
        case .header: return 0
        case .basicAuth: return 1
        case .query: return 2
        case .body: return 3
        case .websocket: return 5
        default: return 4
        }
    }

    mutating func makeViolation(secret: Int, site: Site, form: PlaceholderForm, reason: ViolationReason) -> Violation {
        Violation(secret: secrets[secret].env, site: site, form: form, reason: reason, request: currentSummary())
    }
}
