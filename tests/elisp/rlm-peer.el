;;; rlm-peer.el --- A scripted JSON-RPC peer on a real Unix socket  -*- lexical-binding: t; -*-

;;; Commentary:

;; For the parts of the protocol whose daemon side lives on other
;; branches (follow_up, phase events, sources/supported, repl/*,
;; improve/*): a server on a real Unix socket in this Emacs, speaking
;; the daemon's Content-Length framing and JSON-RPC 2.0, answering with
;; scripted handlers.  rlm.el talks to it exactly as to the daemon.
;;
;; A handler is called with (PEER CONN ID PARAMS) and returns the
;; result (a plist), (:error CODE MESSAGE KIND), or `defer' when it
;; answers later with `rlm-peer-reply'.  Every request is recorded in
;; the peer's `requests' (method . params), oldest first.

;;; Code:

(require 'cl-lib)
(require 'json)

(cl-defstruct (rlm-peer (:constructor rlm-peer--create) (:copier nil))
  "A scripted JSON-RPC server."
  path process handlers (requests nil) (contexts (make-hash-table :test #'equal)))

(defun rlm-peer--send (conn message)
  "Send MESSAGE, a plist, on CONN with Content-Length framing."
  (let ((body (encode-coding-string
               (json-serialize message :null-object nil :false-object :json-false)
               'utf-8)))
    (process-send-string conn (format "Content-Length: %d\r\n\r\n" (length body)))
    (process-send-string conn body)))

(defun rlm-peer-reply (conn id result)
  "Answer request ID on CONN with RESULT (or (:error CODE MESSAGE KIND))."
  (rlm-peer--send conn
                  (if (eq (car-safe result) :error)
                      (list :jsonrpc "2.0" :id id
                            :error (list :code (nth 1 result) :message (nth 2 result)
                                         :data (list :kind (nth 3 result))))
                    (list :jsonrpc "2.0" :id id :result (or result (make-hash-table))))))

(defun rlm-peer-notify (conn job seq params)
  "Send a `query/event' of JOB numbered SEQ with PARAMS on CONN."
  (rlm-peer--send conn (list :jsonrpc "2.0" :method "query/event"
                             :params (append (list :job job :seq seq) params))))

(defun rlm-peer--handle (peer conn message)
  "Answer MESSAGE, a parsed request, from PEER on CONN."
  (let* ((method (plist-get message :method))
         (id (plist-get message :id))
         (params (plist-get message :params))
         (handler (cdr (assoc method (rlm-peer-handlers peer)))))
    (setf (rlm-peer-requests peer)
          (append (rlm-peer-requests peer) (list (cons method params))))
    (let ((result (if handler
                      (funcall handler peer conn id params)
                    (list :error -32601 (format "no method %s" method) "method_not_found"))))
      (when (and id (not (eq result 'defer)))
        (rlm-peer-reply conn id result)))))

(defun rlm-peer--filter (peer)
  "Return a process filter parsing frames for PEER."
  (lambda (conn string)
    (let ((buf (concat (or (process-get conn 'pending) "")
                       (encode-coding-string string 'binary)))
          (done nil))
      (while (and (not done)
                  (string-match "\\`Content-Length: *\\([0-9]+\\)\r\n\r\n" buf))
        (let* ((len (string-to-number (match-string 1 buf)))
               (start (match-end 0)))
          (if (< (length buf) (+ start len))
              (setq done t)             ; wait for the rest of the body
            (let ((body (decode-coding-string (substring buf start (+ start len)) 'utf-8)))
              (setq buf (substring buf (+ start len)))
              (process-put conn 'pending buf)
              (rlm-peer--handle peer conn (json-parse-string body :object-type 'plist
                                                             :null-object nil
                                                             :false-object :json-false))))))
      (process-put conn 'pending buf))))

(defun rlm-peer-start (handlers)
  "Start a peer answering with HANDLERS, an alist of method name to handler."
  (let* ((dir (make-temp-file "rlmpeer" t))
         (path (expand-file-name "p.sock" dir))
         (peer (rlm-peer--create :path path :handlers handlers)))
    (setf (rlm-peer-process peer)
          (make-network-process :name "rlm-peer" :server t :family 'local
                                :service path :noquery t :coding 'binary
                                :filter (rlm-peer--filter peer)))
    ;; The default handlers every client needs.
    (setf (rlm-peer-handlers peer)
          (append handlers
                  (list (cons "context/put" #'rlm-peer--context-put)
                        (cons "context/info" #'rlm-peer--context-info)
                        (cons "query/cancel" (lambda (&rest _) '(:cancelled t))))))
    peer))

(defun rlm-peer--context-put (peer _conn _id params)
  "Store a context of PEER from PARAMS."
  (let ((text (plist-get params :text)))
    (puthash (plist-get params :name) text (rlm-peer-contexts peer))
    (list :name (plist-get params :name) :chars (length text))))

(defun rlm-peer--context-info (peer _conn _id params)
  "Describe a context of PEER named in PARAMS."
  (let ((text (gethash (plist-get params :name) (rlm-peer-contexts peer))))
    (if text (list :name (plist-get params :name) :chars (length text))
      (list :error -32001 "no such context" "not_found"))))

(defun rlm-peer-stop (peer)
  "Stop PEER and remove its socket."
  (delete-process (rlm-peer-process peer))
  (delete-directory (file-name-directory (rlm-peer-path peer)) t))

(defun rlm-peer-requests-of (peer method)
  "Return the params of PEER's requests of METHOD, oldest first."
  (mapcar #'cdr (cl-remove-if-not (lambda (r) (equal (car r) method))
                                  (rlm-peer-requests peer))))

(defmacro rlm-with-peer (var handlers &rest body)
  "Run BODY with VAR a peer answering HANDLERS, rlm.el connected to it."
  (declare (indent 2) (debug t))
  `(let* ((,var (rlm-peer-start ,handlers))
          (rlm-socket-path (rlm-peer-path ,var))
          (rlm-daemon-command nil)
          (rlm-query-options nil)
          (rlm--connection nil))
     (unwind-protect (progn ,@body)
       (rlm-disconnect)
       (rlm-peer-stop ,var))))

(provide 'rlm-peer)
;;; rlm-peer.el ends here
