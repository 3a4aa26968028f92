// Command linkerd-check judges an issuer certificate, its key and a trust bundle the way
// Linkerd does, so integration tests can ask "would Linkerd accept what the daemon published?".
//
// The Linkerd Go module (github.com/linkerd/linkerd2) is not served by the module proxy this
// project can reach, so this helper cannot import it. Instead it re-implements, with the Go
// standard library only, the code paths that decide acceptance, following Linkerd's sources
// step by step and reproducing their error texts (file names below are in linkerd/linkerd2):
//
//  1. `linkerd install`/`upgrade`: pkg/issuercerts/issuercerts.go
//     IssuerCertData.VerifyAndBuildCreds (with pkg/tls/cred.go ValidateAndCreateCreds and
//     Crt.Verify, and pkg/tls/codec.go DecodePEMKey/DecodePEMCertificates/DecodePEMCertPool);
//  2. `linkerd check`, the one fatal check VerifyAndBuildCreds does not already make:
//     pkg/healthcheck/healthcheck.go "trust anchors are within their validity period"
//     (CheckCertValidityPeriod on every anchor in the bundle, not only the one that signed);
//  3. the identity controller loading the issuer: controller/cmd/identity/main.go
//     (DecodePEMCertPool of the anchors) and pkg/identity/service.go Service.Initialize ->
//     loadCredentials (ReadPEMCreds, Crt.Verify against the anchors with no DNS name, IsCA);
//  4. the identity controller certifying a proxy: Service.Certify -> ensureIssuerStillValid,
//     checkCSR, pkg/tls/ca.go CA.IssueEndEntityCrt (ECDSA-SHA256, issuance lifetime plus clock
//     skew, clamped to the issuer chain's first expiry); Certify's errors are gRPC statuses.
//  5. then the proxy's view: the leaf must verify against the bundle for its identity name.
//     The real proxy is Rust (rustls/webpki); this step uses Go's x509, so its error text is
//     this helper's own, not Linkerd's.
//
// Not reproduced: `linkerd check`'s "trust anchors are using supported crypto algorithm"
// (CheckTrustAnchorAlgoRequirements since linkerd2 #8868), whose source was not available.
//
// Exit status 0: every check passed (each printed as "ok: ..."; warnings as "warning: ...").
// Exit status 1: the first failing check, printed as "FAIL <stage>: <Linkerd's error text>".
// Exit status 2: usage.
package main

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"math/big"
	"os"
	"reflect"
	"strings"
	"time"
)

const (
	// pkg/identity/service.go DefaultIssuanceLifetime. The clock skew is what an installed
	// identity controller runs with: the chart's identity.issuer.clockSkewAllowance (20s),
	// passed as -identity-clock-skew-allowance; pkg/tls/ca.go's DefaultClockSkewAllowance (10s)
	// applies only when that flag is absent.
	issuanceLifetime   = 24 * time.Hour
	clockSkewAllowance = 20 * time.Second
	// pkg/issuercerts/issuercerts.go expirationWarningThresholdInDays (CheckExpiringSoon: a
	// `linkerd check` warning, not a failure).
	expiryWarningDays = 60
)

// now is the moment every check is made at: the wall clock, or --now for tests that run
// the daemon on a simulated clock (Linkerd itself always uses the wall clock).
var now = time.Now

// cred is an issuer certificate with its chain (root first, as Linkerd stores it) and key.
type cred struct {
	cert  *x509.Certificate
	chain []*x509.Certificate
	key   crypto.Signer
}

func main() {
	bundlePath := flag.String("bundle", "", "trust bundle PEM (the trust anchors)")
	crtPath := flag.String("issuer-crt", "", "issuer certificate PEM (leaf first, then chain)")
	keyPath := flag.String("issuer-key", "", "issuer private key PEM")
	expectedName := flag.String("expected-name", "identity.linkerd.cluster.local",
		"issuer name the identity controller expects (used only in its error messages)")
	identity := flag.String("identity", "default.default.serviceaccount.identity.linkerd.cluster.local",
		"proxy identity to certify in the issuance check")
	at := flag.String("now", "", "check as of this RFC 3339 time instead of the wall clock")
	flag.Parse()
	if *at != "" {
		moment, err := time.Parse(time.RFC3339, *at)
		if err != nil {
			fmt.Fprintf(os.Stderr, "linkerd-check: --now: %s\n", err)
			os.Exit(2)
		}
		now = func() time.Time { return moment }
	}
	if *bundlePath == "" || *crtPath == "" || *keyPath == "" {
		fmt.Fprintln(os.Stderr, "usage: linkerd-check --bundle FILE --issuer-crt FILE --issuer-key FILE")
		os.Exit(2)
	}
	bundle, crtPEM, keyPEM := mustRead(*bundlePath), mustRead(*crtPath), mustRead(*keyPath)

	creds, err := verifyAndBuildCreds(bundle, crtPEM, keyPEM)
	check("install (issuercerts.VerifyAndBuildCreds)", err)
	fmt.Printf("ok: install/upgrade accept the issuer %q (expires %s)\n",
		creds.cert.Subject.CommonName, creds.cert.NotAfter.UTC().Format(time.RFC3339))

	anchorCerts, err := decodePEMCertificates(bundle)
	check("check (healthcheck: certificate config is valid)", err)
	check("check (healthcheck: trust anchors are within their validity period)",
		checkAnchorsValidityPeriod(anchorCerts))
	fmt.Println("ok: linkerd check finds every trust anchor within its validity period")
	// The two "valid for at least 60 days" checks of `linkerd check` are warnings only.
	if err := checkExpiringSoon(creds.cert); err != nil {
		fmt.Printf("warning: issuer certificate %s\n", err)
	}
	if err := checkAnchorsExpiringSoon(anchorCerts); err != nil {
		fmt.Printf("warning: %s\n", err)
	}

	// controller/cmd/identity/main.go: the anchors come from the trust-roots bundle.
	anchors, err := decodePEMCertPool(bundle)
	if err != nil {
		err = fmt.Errorf("Failed to read trust anchors: %s", err)
	}
	check("identity (main: trust anchors)", err)
	issuer, err := loadCredentials(anchors, crtPEM, keyPEM, *expectedName)
	check("identity (Service.Initialize)", err)
	fmt.Println("ok: identity controller loads the issuer against the trust anchors")

	leaf, err := certify(issuer, anchors, *identity)
	check("issuance (Service.Certify)", err)
	check("proxy (verify issued leaf; Go x509, not Linkerd's text)",
		proxyVerify(leaf, issuer, anchors, *identity))
	fmt.Printf("ok: issued proxy cert for %s valid until %s verifies against the bundle\n",
		*identity, leaf.NotAfter.UTC().Format(time.RFC3339))
}

func mustRead(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		fmt.Fprintf(os.Stderr, "linkerd-check: %s\n", err)
		os.Exit(2)
	}
	return string(b)
}

func check(stage string, err error) {
	if err != nil {
		fmt.Printf("FAIL %s: %s\n", stage, err)
		os.Exit(1)
	}
}

// verifyAndBuildCreds mirrors pkg/issuercerts IssuerCertData.VerifyAndBuildCreds.
func verifyAndBuildCreds(anchorsPEM, crtPEM, keyPEM string) (*cred, error) {
	c, err := validateAndCreateCreds(crtPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("failed to read CA: %s", err)
	}
	if err := checkCertValidityPeriod(c.cert); err != nil {
		return nil, err
	}
	if err := checkCertAlgoRequirements(c.cert); err != nil {
		return nil, err
	}
	if !c.cert.IsCA {
		return nil, errors.New("issuer cert is not a CA")
	}
	anchors, err := decodePEMCertPool(anchorsPEM)
	if err != nil {
		return nil, err
	}
	if err := c.verify(anchors, ""); err != nil {
		return nil, err
	}
	return c, nil
}

// loadCredentials mirrors pkg/identity Service.loadCredentials: read key+cert (ReadPEMCreds
// is ValidateAndCreateCreds on the files), verify the issuer against the anchors with no DNS
// name (it is a CA, not a leaf), then require a CA (linkerd2 #6466, fixing #6453).
func loadCredentials(anchors *x509.CertPool, crtPEM, keyPEM, expectedName string) (*cred, error) {
	c, err := validateAndCreateCreds(crtPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("failed to read CA from disk: %s", err)
	}
	if err := c.verify(anchors, ""); err != nil {
		return nil, fmt.Errorf("failed to verify issuer credentials for '%s' with trust anchors: %s",
			expectedName, err)
	}
	if !c.cert.IsCA {
		return nil, errors.New("failed to verify issuer certificate: it must be an intermediate-CA, but it is not")
	}
	return c, nil
}

// grpcStatus renders what Certify returns for a google.golang.org/grpc/status error
// (status.Error(code, msg).Error()).
func grpcStatus(code, msg string) error {
	return fmt.Errorf("rpc error: code = %s desc = %s", code, msg)
}

// certify mirrors Service.Certify for a proxy: the issuer must still verify
// (ensureIssuerStillValid, returned as a plain error), the CSR must pass checkCSR
// (FailedPrecondition), and the CA signs it (pkg/tls/ca.go; Internal on failure).
func certify(issuer *cred, anchors *x509.CertPool, identity string) (*x509.Certificate, error) {
	if err := issuer.verify(anchors, ""); err != nil { // ensureIssuerStillValid
		return nil, err
	}
	proxyKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader) // proxies use P-256
	if err != nil {
		return nil, err
	}
	csrDER, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{
		Subject:  pkix.Name{CommonName: identity},
		DNSNames: []string{identity},
	}, proxyKey)
	if err != nil {
		return nil, err
	}
	csr, err := x509.ParseCertificateRequest(csrDER)
	if err != nil {
		return nil, err
	}
	if err := checkCSR(csr, identity); err != nil {
		return nil, grpcStatus("FailedPrecondition", err.Error())
	}
	leaf, err := issueEndEntityCrt(issuer, csr)
	if err != nil {
		return nil, grpcStatus("Internal", err.Error())
	}
	return leaf, nil
}

// proxyVerify approximates the proxy's check of what Certify returned: the leaf plus the
// issuer chain (CertifyResponse.IntermediateCertificates) must verify against the anchors for
// the proxy's identity name. Not Linkerd Go code: the proxy is Rust (rustls/webpki).
func proxyVerify(leaf *x509.Certificate, issuer *cred, anchors *x509.CertPool, identity string) error {
	intermediates := x509.NewCertPool()
	intermediates.AddCert(issuer.cert)
	for _, c := range issuer.chain {
		intermediates.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{
		Roots: anchors, Intermediates: intermediates, DNSName: identity, CurrentTime: now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("issued certificate does not verify against the trust anchors: %s", err)
	}
	return nil
}

// issueEndEntityCrt mirrors pkg/tls CA.IssueEndEntityCrt with Linkerd's certificate template
// (createTemplate, Validity.Window, the clamp to firstCrtExpiration) and Cred.SignCrt.
func issueEndEntityCrt(issuer *cred, csr *x509.CertificateRequest) (*x509.Certificate, error) {
	pub, ok := csr.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return nil, fmt.Errorf("CSR must contain an ECDSA public key: %+v", csr.PublicKey)
	}
	issuedAt := now()
	notAfter := issuedAt.Add(issuanceLifetime).Add(clockSkewAllowance)
	// Clamp to the first expiry in the issuer's chain (findFirstExpiration).
	first := issuer.cert.NotAfter
	for _, c := range issuer.chain {
		if c.NotAfter.Before(first) {
			first = c.NotAfter
		}
	}
	if first.Before(notAfter) {
		notAfter = first
	}
	template := &x509.Certificate{
		SerialNumber:       big.NewInt(1),        // a fresh CA's nextSerialNumber
		SignatureAlgorithm: x509.ECDSAWithSHA256, // the only algorithm Linkerd signs with
		NotBefore:          issuedAt.Add(-clockSkewAllowance),
		NotAfter:           notAfter,
		PublicKey:          pub,
		KeyUsage:           x509.KeyUsageKeyEncipherment | x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{
			x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth,
		},
		Issuer:          issuer.cert.Subject,
		Subject:         csr.Subject,
		Extensions:      csr.Extensions,
		ExtraExtensions: csr.ExtraExtensions,
		DNSNames:        csr.DNSNames,
		EmailAddresses:  csr.EmailAddresses,
		IPAddresses:     csr.IPAddresses,
		URIs:            csr.URIs,
	}
	der, err := x509.CreateCertificate(rand.Reader, template, issuer.cert, pub, issuer.key)
	if err != nil {
		return nil, err
	}
	return x509.ParseCertificate(der)
}

// checkCSR mirrors pkg/identity checkCSR.
func checkCSR(csr *x509.CertificateRequest, identity string) error {
	if len(csr.DNSNames) != 1 {
		return errors.New("CSR must have exactly one DNSName")
	}
	if csr.DNSNames[0] != identity {
		return fmt.Errorf("CSR name does not match requested identity: csr=%s; req=%s",
			csr.DNSNames[0], identity)
	}
	switch csr.Subject.CommonName {
	case "", identity:
	default:
		return fmt.Errorf("invalid CommonName: %s", csr.Subject.CommonName)
	}
	if len(csr.EmailAddresses) > 0 {
		return errors.New("cannot validate email addresses")
	}
	if len(csr.IPAddresses) > 0 {
		return errors.New("cannot validate IP addresses")
	}
	if len(csr.URIs) > 0 {
		return errors.New("cannot validate URIs")
	}
	return nil
}

// validateAndCreateCreds mirrors pkg/tls ValidateAndCreateCreds: decode the key first, then
// the certificates (DecodePEMCrt: leaf first, the rest is the chain), then require that the
// key matches the first certificate.
func validateAndCreateCreds(crtPEM, keyPEM string) (*cred, error) {
	key, err := decodePEMKey(keyPEM)
	if err != nil {
		return nil, err
	}
	certs, err := decodePEMCertificates(crtPEM)
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, errors.New("No certificates found") // DecodePEMCrt's capitalisation
	}
	if !keyMatches(key, certs[0]) {
		return nil, errors.New("tls: Public and private key do not match")
	}
	// Linkerd stores the chain root first; the PEM lists it leaf first.
	chain := make([]*x509.Certificate, 0, len(certs)-1)
	for i := len(certs) - 1; i >= 1; i-- {
		chain = append(chain, certs[i])
	}
	return &cred{cert: certs[0], chain: chain, key: key}, nil
}

// decodePEMKey mirrors pkg/tls DecodePEMKey: only the first PEM block is read; EC (SEC 1),
// RSA (PKCS#1) and PKCS#8 holding an ECDSA or RSA key are accepted.
func decodePEMKey(txt string) (crypto.Signer, error) {
	block, _ := pem.Decode([]byte(txt))
	if block == nil {
		return nil, errors.New("not PEM-encoded")
	}
	switch block.Type {
	case "EC PRIVATE KEY":
		return x509.ParseECPrivateKey(block.Bytes)
	case "RSA PRIVATE KEY":
		return x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
		if err != nil {
			return nil, err
		}
		switch key := k.(type) {
		case *ecdsa.PrivateKey:
			return key, nil
		case *rsa.PrivateKey:
			return key, nil
		}
		return nil, fmt.Errorf("unsupported PKCS#8 encoded private key type: '%s', "+
			"linkerd2 only supports ECDSA and RSA private keys", reflect.TypeOf(k))
	default:
		return nil, fmt.Errorf("unsupported block type: '%s'", block.Type)
	}
}

// keyMatches mirrors pkg/tls privateKeyEC/privateKeyRSA matchesCertificate.
func keyMatches(key crypto.Signer, cert *x509.Certificate) bool {
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
		return ok && pub.X.Cmp(k.X) == 0 && pub.Y.Cmp(k.Y) == 0
	case *rsa.PrivateKey:
		pub, ok := cert.PublicKey.(*rsa.PublicKey)
		return ok && pub.N.Cmp(k.N) == 0 && pub.E == k.E
	default:
		return false
	}
}

// decodePEMCertificates mirrors pkg/tls DecodePEMCertificates, quirks included: text that is
// not PEM (e.g. trailing junk) is an error, and the first non-CERTIFICATE block ends parsing.
func decodePEMCertificates(txt string) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	buf := []byte(txt)
	for len(buf) > 0 {
		block, rest := pem.Decode(buf)
		if block == nil {
			return certs, errors.New("not a PEM certificate")
		}
		if block.Type != "CERTIFICATE" {
			break
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return certs, err
		}
		certs = append(certs, c)
		buf = rest
	}
	return certs, nil
}

// decodePEMCertPool mirrors pkg/tls DecodePEMCertPool.
func decodePEMCertPool(txt string) (*x509.CertPool, error) {
	certs, err := decodePEMCertificates(txt)
	if err != nil {
		return nil, err
	}
	if len(certs) == 0 {
		return nil, errors.New("no certificates found")
	}
	pool := x509.NewCertPool()
	for _, c := range certs {
		pool.AddCert(c)
	}
	return pool, nil
}

// verify mirrors pkg/tls Crt.Verify with a zero currentTime: the chain in the PEM serves as
// intermediates, the current time is used, and an expiry error (x509.CertificateInvalidError
// with Reason Expired, whichever certificate of the chain it is about) is decorated with the
// time and this certificate's validity window, as crtExpiryError does.
func (c *cred) verify(roots *x509.CertPool, name string) error {
	intermediates := x509.NewCertPool()
	for _, ch := range c.chain {
		intermediates.AddCert(ch)
	}
	_, err := c.cert.Verify(x509.VerifyOptions{
		Roots: roots, Intermediates: intermediates, DNSName: name, CurrentTime: now(),
	})
	var invalid x509.CertificateInvalidError
	if errors.As(err, &invalid) && invalid.Reason == x509.Expired {
		return fmt.Errorf("%s - Current Time : %s - Invalid before %s - Invalid After %s",
			err, now(), c.cert.NotBefore, c.cert.NotAfter)
	}
	return err
}

// checkCertValidityPeriod mirrors pkg/issuercerts CheckCertValidityPeriod.
func checkCertValidityPeriod(cert *x509.Certificate) error {
	if cert.NotBefore.After(now()) {
		return fmt.Errorf("not valid before: %s", cert.NotBefore.Format(time.RFC3339))
	}
	if cert.NotAfter.Before(now()) {
		return fmt.Errorf("not valid anymore. Expired on %s", cert.NotAfter.Format(time.RFC3339))
	}
	return nil
}

// checkExpiringSoon mirrors pkg/issuercerts CheckExpiringSoon.
func checkExpiringSoon(cert *x509.Certificate) error {
	if now().AddDate(0, 0, expiryWarningDays).After(cert.NotAfter) {
		return fmt.Errorf("will expire on %s", cert.NotAfter.Format(time.RFC3339))
	}
	return nil
}

// anchorProblems lists "* <serial> <CN> <err>" for each anchor failing fn, the way
// pkg/healthcheck reports trust anchors.
func anchorProblems(anchors []*x509.Certificate, fn func(*x509.Certificate) error) string {
	var lines []string
	for _, a := range anchors {
		if err := fn(a); err != nil {
			lines = append(lines, fmt.Sprintf("* %v %s %s", a.SerialNumber, a.Subject.CommonName, err))
		}
	}
	return strings.Join(lines, "\n\t")
}

// checkAnchorsValidityPeriod mirrors pkg/healthcheck "trust anchors are within their
// validity period" (fatal).
func checkAnchorsValidityPeriod(anchors []*x509.Certificate) error {
	if p := anchorProblems(anchors, checkCertValidityPeriod); p != "" {
		return fmt.Errorf("Invalid anchors:\n\t%s", p)
	}
	return nil
}

// checkAnchorsExpiringSoon mirrors pkg/healthcheck "trust anchors are valid for at least 60
// days" (a warning).
func checkAnchorsExpiringSoon(anchors []*x509.Certificate) error {
	if p := anchorProblems(anchors, checkExpiringSoon); p != "" {
		return fmt.Errorf("Anchors expiring soon:\n\t%s", p)
	}
	return nil
}

// checkCertAlgoRequirements mirrors pkg/issuercerts CheckCertAlgoRequirements: the issuer key
// must be ECDSA P-256 (Linkerd only signs with ECDSA-SHA256). Its signature may also be
// SHA256-RSA: linkerd2 PR #8868 (fixing #7771, in 2.12) allows an RSA trust anchor above an
// ECDSA issuer. The source of that version could not be read here, so the texts below are
// those of the pre-#8868 function; the signature-algorithm text may differ in 2.12+.
func checkCertAlgoRequirements(cert *x509.Certificate) error {
	if cert.PublicKeyAlgorithm != x509.ECDSA {
		return fmt.Errorf("must use ECDSA for public key algorithm, instead %s was used",
			cert.PublicKeyAlgorithm)
	}
	k, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok {
		return fmt.Errorf("expected ecdsa.PublicKey but got something %v", cert.PublicKey)
	}
	if k.Params().BitSize != 256 {
		return fmt.Errorf("must use P-256 curve for public key, instead P-%d was used",
			k.Params().BitSize)
	}
	switch cert.SignatureAlgorithm {
	case x509.ECDSAWithSHA256, x509.SHA256WithRSA:
		return nil
	default:
		return fmt.Errorf("must be signed by an ECDSA P-256 key, instead %s was used",
			cert.SignatureAlgorithm)
	}
}
